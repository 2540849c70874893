//! The monitor: the cluster at a glance, served over HTTP beside the
//! message server (`monitor.listen`, default `127.0.0.1:7480`).
//!
//! | path | what |
//! | --- | --- |
//! | `/` | an HTML page that fetches `/api/v1/snapshot` every 2 s and shows it |
//! | `/api/v1/snapshot` | everything below in one object |
//! | `/api/v1/status` | the server: version, cluster, role, totals, counters |
//! | `/api/v1/members` | every member: groups, services, addresses, heartbeat age |
//! | `/api/v1/nodes` | every member's queue, rates and per-path counts |
//! | `/api/v1/events` | the last [`EVENTS_KEPT`] membership events and refusals |
//! | `/api/v1/dead-letters?limit=N` | the dead-letter queue's state and its newest `N` entries (default [`DEAD_LETTERS_DEFAULT_LIMIT`], at most [`DEAD_LETTERS_MAX_LIMIT`]), without bodies |
//! | `/metrics` | Prometheus metrics (OpenMetrics if the scraper asks) |
//!
//! It costs nothing per message beyond the counters the server keeps
//! anyway: everything is read from the table, the queues and the counters
//! when a page is asked for. It has no access control, so it listens on
//! loopback unless told otherwise.
//!
//! The binary starts it; an embedder that runs a [`MessageServer`] starts
//! it with [`Monitor::bind`] and [`Monitor::run`]:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use message_server::monitor::Monitor;
//! use message_server::MessageServer;
//!
//! let config = cluster_config::Config::default();
//! let server = MessageServer::bind(config.clone()).await?;
//! if let Some(addr) = config.monitor.listen {
//!     let monitor = Monitor::bind(addr, server.handle()).await?;
//!     println!("monitor on {}", monitor.url());
//!     tokio::spawn(monitor.run(std::future::pending()));
//! }
//! server.run(std::future::pending()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - `http`: the routes, and the listener's caps (connections, idle time).
//! - [`snapshot`]: what is shown, and how it is read from the server.
//! - [`events`]: the ring buffers of membership events and refusals.
//! - [`dead_letters`]: the dead-letter queue's state and newest entries.
//! - [`metrics`]: the snapshot as Prometheus metrics.
//! - [`role`]: primary or standby, from `message_server.addresses`.
//!
//! [`MessageServer`]: crate::MessageServer

pub mod dead_letters;
pub mod events;
mod http;
pub mod metrics;
pub mod role;
pub mod snapshot;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub use dead_letters::{DEAD_LETTERS_DEFAULT_LIMIT, DEAD_LETTERS_MAX_LIMIT};
pub(crate) use events::EventLog;
pub use events::EVENTS_KEPT;
pub use snapshot::Snapshot;

use crate::ServerHandle;

/// Connections the monitor serves at once; more are closed as they come.
pub const MONITOR_MAX_CONNECTIONS: usize = 64;

/// A monitor connection that neither reads nor writes for this long is
/// closed.
pub const MONITOR_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Time the monitor gives its connections to finish after shutdown.
pub const MONITOR_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Errors of the monitor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MonitorError {
    /// `monitor.listen` could not be bound.
    #[error("cannot listen on {addr} (monitor.listen)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed for good.
    #[error("the monitor stopped serving")]
    Serve(#[source] std::io::Error),
}

/// A bound monitor, ready to run.
#[derive(Debug)]
pub struct Monitor {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    state: Arc<State>,
}

/// What the monitor's handlers share.
#[derive(Debug)]
struct State {
    server: ServerHandle,
    role: role::ServerRole,
    sampler: snapshot::Sampler,
}

impl State {
    fn snapshot(&self) -> Snapshot {
        let shared = self.server.shared();
        snapshot::gather(shared, self.server.local_addr(), &self.role, &self.sampler)
    }
}

impl Monitor {
    /// Binds `addr` for the server behind `server`.
    ///
    /// # Errors
    ///
    /// [`MonitorError::Bind`] if the address cannot be bound.
    pub async fn bind(addr: SocketAddr, server: ServerHandle) -> Result<Monitor, MonitorError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| MonitorError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| MonitorError::Bind { addr, source })?;
        let addresses = &server.shared().config.message_server.addresses;
        let role = role::ServerRole::of(server.local_addr(), addresses);
        Ok(Monitor {
            listener,
            local_addr,
            state: Arc::new(State {
                server,
                role,
                sampler: snapshot::Sampler::default(),
            }),
        })
    }

    /// The address the monitor listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The page's URL: `http://ADDR/`, with loopback in place of an
    /// unspecified address (`0.0.0.0` listens on every interface; a browser
    /// on this host reaches it on loopback).
    pub fn url(&self) -> String {
        let mut addr = self.local_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        format!("http://{addr}/")
    }

    /// Everything the monitor shows, now.
    pub fn snapshot(&self) -> Snapshot {
        self.state.snapshot()
    }

    /// Serves until `shutdown` resolves, then gives open connections
    /// [`MONITOR_SHUTDOWN_GRACE`] to finish.
    ///
    /// # Errors
    ///
    /// [`MonitorError::Serve`] if serving fails for good.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), MonitorError> {
        tracing::info!(addr = %self.local_addr, "monitor listening");
        http::serve(self.listener, self.state, shutdown)
            .await
            .map_err(MonitorError::Serve)
    }
}
